"""MONAI Label app serving RadDiagSeg: diagnose-and-segment inference, fine-tuning on corrections, active learning.

    MONAI_LABEL_TRACKING_ENABLED=false .venv/bin/python -m monailabel.main start_server --app MONAILabelApp \
        --studies MONAILabelApp/sample-studies --conf models raddiagseg

See MONAILabelApp/README.md for the request parameters, the response and the label-info keys.
"""

import logging

import raddiagseg
from lib import dicom_seg
from lib.configs.raddiagseg import RadDiagSegAppConfig
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.interfaces.app import MONAILabelApp

logger = logging.getLogger(__name__)

MODELS = ("raddiagseg",)


class RadDiagApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        conf = conf or {}
        requested = [m.strip() for m in str(conf.get("models", "raddiagseg")).split(",") if m.strip()]
        unknown = [m for m in requested if m not in MODELS and m != "all"]
        if unknown:
            raise ValueError(f"--conf models: unknown model(s) {', '.join(unknown)}; available: {', '.join(MODELS)}")
        self.raddiag = RadDiagSegAppConfig(app_dir, studies, conf)
        logger.info("RadDiag: base model %s, work dir %s", self.raddiag.model_path, self.raddiag.work_dir)
        if not self.raddiag.store.available():
            logger.warning("RadDiag: no model folder at %s: model 'raddiagseg' is not served (absent from /info/) "
                           "until one is there; pass --conf model_path DIR (a folder written by save_pretrained)",
                           self.raddiag.store.current_dir())
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="RadDiag",
            description="Ask a question about a CT or chest X-ray; get a diagnostic answer and named segmentation masks",
            version=raddiagseg.__version__,
        )

    def init_datastore(self):
        datastore = super().init_datastore()
        if isinstance(datastore, DICOMWebDatastore):  # labels go to the PACS as DICOM SEG: name and code them
            dicom_seg.code_saved_labels(datastore)
        return datastore

    def init_infers(self):
        return {self.raddiag.name: self.raddiag.infer()}

    def init_trainers(self):
        return {self.raddiag.name: self.raddiag.trainer()}

    def init_strategies(self):
        return self.raddiag.strategies()
