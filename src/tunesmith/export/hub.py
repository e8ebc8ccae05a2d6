"""Upload an export (a model folder or one GGUF file) to the Hugging Face hub."""

from __future__ import annotations

import os
from pathlib import Path

from tunesmith.utils import UserError, error_line, logger


def hub_token(token: str | None) -> str:
    """``--hub_token``, else ``HF_TOKEN`` or the ``hf auth login`` token; one sentence if none."""
    from huggingface_hub import get_token

    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise UserError(
            "--push_to_hub true needs a Hugging Face token: pass --hub_token, set HF_TOKEN, or "
            "run `hf auth login`"
        )
    return token


def check_push_args(hub_model_id: str | None, token: str | None) -> str:
    """Validate the upload flags before the (slow) export; returns the token to use."""
    if not hub_model_id:
        raise UserError("--push_to_hub true needs --hub_model_id (e.g. your-name/my-model)")
    return hub_token(token)


def push_to_hub(path: Path, repo_id: str, token: str, private: bool) -> str:
    """Create the model repo (if needed) and upload ``path``; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if path.is_dir():
            api.upload_folder(repo_id=repo_id, folder_path=path, commit_message="tunesmith export")
        else:
            api.upload_file(
                path_or_fileobj=path,
                path_in_repo=path.name,
                repo_id=repo_id,
                commit_message="tunesmith export",
            )
    except Exception as e:  # offline, refused, bad token, no rights: all one sentence
        reason = error_line(e)
        raise UserError(
            f"could not upload {path} to the Hugging Face hub repo {repo_id} "
            f"({type(e).__name__}{': ' + reason if reason else ''}); the export itself is "
            "complete, upload it later with `hf upload`"
        ) from None
    logger.info(f"uploaded {path} to {url}")
    return str(url)
