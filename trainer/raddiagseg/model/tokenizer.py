"""Tokenizers: the demo's byte-level BPE built offline from our template corpus, or a local PaliGemma tokenizer.

Both expose the same special tokens: `<image>` placeholders, `<seg000>`… segmentation tokens,
bos/eos/pad. Byte-level BPE encodes any text (free-form questions included) and never splits
special tokens.
"""

from raddiagseg import templates

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
DEMO_VOCAB_SIZE = 1024


def build_demo_tokenizer(num_seg_tokens=templates.NUM_SEG_TOKENS, vocab_size=DEMO_VOCAB_SIZE):
    """Train a byte-level BPE on `templates.template_corpus()`; deterministic, takes well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    seg_tokens = [templates.seg_token(i) for i in range(num_seg_tokens)]
    specials = [PAD, EOS, BOS, UNK, templates.IMAGE_TOKEN, *seg_tokens]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(templates.template_corpus())
    corpus += ["Yes", "No", "yes", "no", "Here is the mask for"]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[templates.IMAGE_TOKEN, *seg_tokens],
    )
    fast.padding_side = "right"
    return fast


def load_tokenizer(path):
    """A tokenizer saved with `save_pretrained` (ours) or shipped with a PaliGemma2 folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def special_token_ids(tokenizer, num_seg_tokens):
    """bos/eos/pad/image ids and the seg-token ids, checking the tokenizer knows every one of them."""
    seg_tokens = [templates.seg_token(i) for i in range(num_seg_tokens)]
    wanted = {"image": templates.IMAGE_TOKEN, **{t: t for t in seg_tokens}}
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in wanted.values() if tok not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing[:4]} (needs <image> and <seg000>..)")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name) is None:
            raise ValueError(f"tokenizer has no {name.removesuffix('_id')} token")
    return {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "image": vocab[templates.IMAGE_TOKEN],
        "seg": [vocab[t] for t in seg_tokens],
    }
