"""Uploading one job's mutable artifacts, each only when its folder changed since its last upload
(the runner calls it periodically while the workload runs, and once when it ended)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from appliance.studioml import transfer
from appliance.studioml.packing import fingerprint
from appliance.studioml.transfer import ArtifactError, RetryPolicy


class Uploader:
    """Uploads the mutable artifacts of one job, each only when it changed."""

    def __init__(self, artifacts: dict, job_dir: Path, retry: RetryPolicy, workload_uid: Optional[int] = None):
        self.artifacts = {n: a for n, a in artifacts.items() if a.mutable}
        self.job_dir = job_dir
        self.retry = retry
        self.workload_uid = workload_uid  # files of a folder it owns are packed only if they are its own
        self.sent: dict = {}
        self.last_upload: Optional[float] = None

    def mark_current(self) -> None:
        """What is on disk now is what the store has (right after fetching)."""
        for name in self.artifacts:
            self.sent[name] = fingerprint(self.job_dir / name)

    def _only_uid(self, src: Path) -> Optional[int]:
        if self.workload_uid is None:
            return None
        try:
            return self.workload_uid if os.lstat(src).st_uid == self.workload_uid else None
        except OSError:
            return None

    def upload_changed(self) -> list[str]:
        """Upload every mutable artifact whose directory changed; the names uploaded.
        Raises StoreUnavailable/AccessDenied/ArtifactError after trying all of them."""
        done, first_error = [], None
        for name, art in self.artifacts.items():
            src = self.job_dir / name
            fp = fingerprint(src)
            if self.sent.get(name) == fp:
                continue
            try:
                transfer.upload(art, src, self.retry, self._only_uid(src))
            except ArtifactError as e:
                first_error = first_error or e
                continue
            self.sent[name] = fp
            done.append(name)
        if done:
            self.last_upload = time.time()
        if first_error is not None:
            raise first_error
        return done
