"""HTTP client for the RadDiag MONAI Label server.

One `requests.Session` per client so connections and the bearer token are reused. Every
failure becomes a `ServerError` whose message says what the user should do about it.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.parse

import requests

from .constants import CONNECT_TIMEOUT, QUICK_TIMEOUT, READ_TIMEOUT
from .multipart import MultipartError, split_infer_response


class ServerError(RuntimeError):
    """A request to the server failed; `str(error)` is a message for the user."""

    def __init__(self, message: str, status: int | None = None, detail: str | None = None,
                 retry_after: str | None = None):
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class InferResult:
    """What /infer returned: the JSON params and, if any, the path of the saved label file."""

    def __init__(self, params: dict | None, label_path: str | None = None, label_filename: str | None = None):
        self.params = params or {}
        self.label_path = label_path
        self.label_filename = label_filename

    @property
    def answer(self) -> str:
        return self.params.get("answer", "")

    def __repr__(self):
        return f"InferResult(answer={self.answer!r}, label_path={self.label_path!r})"


def normalise_url(url: str | None) -> str:
    """Strip blanks and trailing slashes; add http:// when no scheme was typed."""
    url = (url or "").strip().rstrip("/")
    if not url:
        raise ServerError("No server URL: enter the address of the RadDiag server, e.g. http://127.0.0.1:8000.")
    if "://" not in url:
        url = "http://" + url
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ServerError(f"'{url}' is not a server URL: use the form http://host:port.")
    return url


def _detail(response):
    try:
        body = response.json()
    except ValueError:
        text = (response.text or "").strip()
        return text[:300] or None
    if isinstance(body, dict):
        detail = body.get("detail", body.get("message", body.get("error")))
        if isinstance(detail, (list, dict)):
            detail = json.dumps(detail)[:300]
        return detail
    return None


class RadDiagClient:
    """Calls the MONAI Label REST API: /info, /infer, /datastore, /train, /auth."""

    def __init__(self, server_url: str, token: str | None = None,
                 timeout: float | tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT),
                 session: requests.Session | None = None):
        self.server_url = normalise_url(server_url)
        self.timeout = timeout
        self.session = session or requests.Session()
        self.token = None
        self.set_token(token)

    # ------------------------------------------------------------------ plumbing
    def set_token(self, token: str | None) -> None:
        """Use `token` (a bearer token) on every following request; None or "" removes it."""
        token = (token or "").strip()
        if token.lower().startswith("bearer "):
            token = token[7:].strip()
        self.token = token or None
        if self.token:
            self.session.headers["Authorization"] = f"Bearer {self.token}"
        else:
            self.session.headers.pop("Authorization", None)

    def _quick(self):
        """Timeout for calls that should answer at once (the server answers /info/ while it works)."""
        if isinstance(self.timeout, tuple):
            return (self.timeout[0], min(self.timeout[1], QUICK_TIMEOUT))
        return min(self.timeout, QUICK_TIMEOUT)

    def _url(self, path):
        return self.server_url + path

    def _request(self, method, path, action, timeout=None, **kwargs):
        url = self._url(path)
        try:
            response = self.session.request(method, url, timeout=timeout or self.timeout, **kwargs)
        except requests.exceptions.SSLError as e:
            raise ServerError(f"Secure connection to {self.server_url} failed while trying to {action}: "
                              f"check that the URL scheme (http/https) and the server certificate are right. ({e})") from e
        except requests.exceptions.ConnectTimeout as e:
            raise ServerError(f"Could not reach {self.server_url} while trying to {action} (connection timed out): "
                              "check the URL, the network, and that the server is running.") from e
        except requests.exceptions.ConnectionError as e:
            raise ServerError(f"Could not connect to {self.server_url} while trying to {action}: "
                              "check the URL / is the server running?") from e
        except requests.exceptions.Timeout as e:
            limit = timeout or self.timeout
            read = limit[1] if isinstance(limit, tuple) else limit
            raise ServerError(f"The server did not answer within {read:.0f} s while trying to {action}: it may be busy "
                              "(training, or a large volume); try again, ask about the current slice, or raise the timeout.") from e
        except requests.exceptions.RequestException as e:
            raise ServerError(f"Request to {url} failed while trying to {action}: {e}") from e
        if response.status_code >= 400:
            raise self._error(response, action)
        return response

    def _error(self, response, action):
        status = response.status_code
        detail = _detail(response)
        suffix = f" Server says: {detail}" if detail else ""
        retry_after = None
        if status == 401:
            message = (f"Not authorised to {action}: token missing or expired. "
                       "Enter a valid access token (or log in) in the Server section.")
        elif status == 403:
            message = (f"Your token is not allowed to {action}. "
                       "Ask the server admin for a token with the needed role.")
        elif status == 404:
            message = f"Not found while trying to {action}: check the model name and that the server runs the RadDiag app."
        elif status == 413:
            message = (f"The upload is too large for the server's limit ({action}): crop the image first "
                       "(Crop Volume module) or ask the server admin to raise the upload limit.")
        elif status == 422:
            message = f"The server rejected the request to {action} as invalid."
        elif status == 429:
            message = f"The server is already busy and cannot {action} now (a training may be running); try again later."
        elif status == 503:
            retry_after = response.headers.get("Retry-After")
            wait = f" in {retry_after} s" if retry_after else " in a moment"
            message = f"The server is temporarily unavailable and cannot {action}; try again{wait}."
        elif status >= 500:
            message = f"The server failed to {action} (HTTP {status}); see the server log."
        else:
            message = f"The server refused to {action} (HTTP {status})."
        return ServerError(message + suffix, status=status, detail=detail, retry_after=retry_after)

    # ------------------------------------------------------------------ endpoints
    def info(self) -> dict:
        """GET /info/: models, trainers, labels, train_stats."""
        return self._request("GET", "/info/", "read the server info", timeout=self._quick()).json()

    def models(self, info: dict | None = None) -> list[str]:
        """Names of the inference models the server offers."""
        info = self.info() if info is None else info
        return sorted((info.get("models") or {}).keys())

    def auth_enabled(self) -> bool:
        """Whether the server asks for a token (GET /auth/; False for servers without that endpoint)."""
        try:
            body = self._request("GET", "/auth/", "check authentication", timeout=self._quick()).json()
        except ServerError as e:
            if e.status == 404:
                return False
            raise
        return bool(body.get("enabled"))

    def login(self, username: str, password: str) -> str:
        """POST /auth/token; on success the token is used for every following request."""
        response = self._request("POST", "/auth/token", "log in",
                                 data={"username": username, "password": password, "grant_type": "password"})
        token = response.json().get("access_token")
        if not token:
            raise ServerError("The server gave no token: authentication is not enabled there, no login needed.")
        self.set_token(token)
        return token

    def image_exists(self, image_id: str) -> bool:
        """HEAD /datastore/image: True when the datastore has `image_id`.

        No `check_sum` is sent: MONAI Label 0.8.5 compares it against "SHA256:<hex>" after
        stripping characters, so it never matches. Content identity comes from the id instead
        (`workflow.image_id_for` puts a content hash in it).
        """
        try:
            self._request("HEAD", "/datastore/image", "check the image in the datastore", params={"image": image_id},
                          timeout=self._quick())
        except ServerError as e:
            if e.status == 404:
                return False
            raise
        return True

    def upload_image(self, path: str, image_id: str | None = None, params: dict | None = None) -> str:
        """PUT /datastore/image: store an image file; returns the image id the server uses."""
        query = {"image": image_id} if image_id else {}
        with open(path, "rb") as f:
            files = {"file": (os.path.basename(path), f)}
            data = {"params": json.dumps(params or {})}
            body = self._request("PUT", "/datastore/image", "upload the image", params=query, files=files, data=data).json()
        return body.get("image", image_id)

    def ensure_image(self, path: str, image_id: str) -> str:
        """Upload `path` as `image_id` unless the datastore already has that id (ids carry a content hash)."""
        if not self.image_exists(image_id):
            image_id = self.upload_image(path, image_id)
        return image_id

    def infer(self, model: str, image_id: str | None = None, image_path: str | None = None,
              params: dict | None = None, result_dir: str | None = None) -> InferResult:
        """POST /infer/{model}: by datastore id (`image_id`) or by uploading `image_path`.

        Returns an InferResult; the label file (if any) is written into `result_dir` (a temp
        folder by default) under the name the server gave it, so the extension is kept.
        """
        if not image_id and not image_path:
            raise ValueError("infer needs image_id or image_path")
        query = {"image": image_id} if image_id else {}
        data = {"params": json.dumps(params or {})}
        action = f"run model '{model}'"
        if image_path:
            with open(image_path, "rb") as f:
                response = self._request("POST", f"/infer/{urllib.parse.quote(model)}", action, params=query,
                                         data=data, files={"file": (os.path.basename(image_path), f)})
        else:
            response = self._request("POST", f"/infer/{urllib.parse.quote(model)}", action, params=query, data=data)
        try:
            params_out, filename, payload = split_infer_response(response.headers.get("Content-Type", ""), response.content)
        except (MultipartError, ValueError) as e:
            raise ServerError(f"The server's answer to '{model}' could not be read ({e}): "
                              "is this a RadDiag server of a compatible version?") from e
        label_path = None
        if payload is not None:
            result_dir = result_dir or tempfile.mkdtemp(prefix="raddiag_")
            os.makedirs(result_dir, exist_ok=True)
            name = os.path.basename(filename or "label.nii.gz") or "label.nii.gz"
            label_path = os.path.join(result_dir, name)
            with open(label_path, "wb") as f:
                f.write(payload)
        return InferResult(params_out, label_path, filename)

    def save_label(self, image_id: str, label_path: str, label_info: dict | None, tag: str = "final") -> dict:
        """PUT /datastore/label: store a corrected label map with its label info (answer, segments...)."""
        with open(label_path, "rb") as f:
            files = {"label": (os.path.basename(label_path), f)}
            data = {"params": json.dumps(label_info or {})}
            return self._request("PUT", "/datastore/label", "save the correction",
                                 params={"image": image_id, "tag": tag}, files=files, data=data).json()

    def start_training(self, model: str, params: dict | None = None, enqueue: bool = False) -> dict:
        """POST /train/{model}: start fine-tuning on the saved corrections."""
        query = {"enqueue": "true"} if enqueue else {}
        return self._request("POST", f"/train/{urllib.parse.quote(model)}", "start training",
                             params=query, json=params or {}).json()

    def training_status(self, all_tasks: bool = False) -> dict | list | None:
        """GET /train/: the latest training task ({status, details, ...}) or None when there never was one."""
        try:
            return self._request("GET", "/train/", "read the training status", timeout=self._quick(),
                                 params={"all": "true" if all_tasks else "false"}).json()
        except ServerError as e:
            if e.status == 404:
                return None
            raise

    def train_stats(self, model: str, info: dict | None = None) -> dict:
        """The trainer's statistics from /info/ (`train_stats[model]`), {} when none yet."""
        info = self.info() if info is None else info
        return ((info.get("train_stats") or {}).get(model)) or {}

    def queue_jobs(self) -> list | None:
        """GET /queue/: the signed-in user's model jobs (state, position, eta_s, slices_done, ...) as the team server
        lists them; None for a server without a job queue (plain MONAI Label)."""
        try:
            body = self._request("GET", "/queue/", "read the job queue", timeout=self._quick()).json()
        except ServerError as e:
            if e.status == 404:
                return None
            raise
        except ValueError:  # not JSON: not a queue
            return None
        jobs = body.get("jobs") if isinstance(body, dict) else None
        return jobs if isinstance(jobs, list) else None

    def stop_training(self) -> dict:
        """DELETE /train/: stop the running training."""
        return self._request("DELETE", "/train/", "stop training").json()
