"""The evaluation journal: every finished episode, appended as it arrives, so no rollout is lost.

``<out>.partial.jsonl`` (beside the results file ``out``) holds one JSON line per line: first a
header naming what determines the records (suite, task, env seeds, step limit, weights, and a
digest of each checkpoint), then one :class:`~difftori.eval.results.EpisodeRecord` per finished
episode, flushed and fsynced. An interrupted evaluation run again with the same header resumes:
its completed (``ok``) records are kept as they are and only the other episodes run, on the same
seeds; a journal with another header is discarded (logged). The journal is deleted once the
results file is written. :func:`check_writable` fails before any rollout when the results folder
cannot take files (read-only, full).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from difftori.datasets.safeio import atomic_write_text, file_sha256, naming_path
from difftori.eval.results import EpisodeRecord

log = logging.getLogger(__name__)
FORMAT, VERSION = "difftori-eval-journal", 1
_PROBE_BYTES = 1 << 16  # written (and removed) to check the results folder has room


def journal_path(out: str | os.PathLike[str]) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial.jsonl")


def checkpoint_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a checkpoint's ``config.json`` (which records its weights' hashes; older
    checkpoints without them: of the weights files too)."""
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    if "files" not in json.loads((path / "config.json").read_text()):
        for f in sorted(path.glob("*.safetensors")):
            h.update(file_sha256(f).encode())
    return "sha256:" + h.hexdigest()


def check_writable(out: str | os.PathLike[str]) -> None:
    """Create ``out``'s folder and write, fsync and delete a probe file there; raise an
    ``OSError`` naming the folder if it cannot take files."""
    out = Path(out)
    probe = out.with_name(f".{out.name}.probe-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * _PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        msg = f"{e.strerror}; the results folder cannot take files, so no episode was run"
        raise OSError(e.errno, msg, str(out.parent)) from None
    finally:
        with contextlib.suppress(OSError):  # a read-only folder refuses even this
            probe.unlink(missing_ok=True)


class EvalJournal:
    """Appends finished episodes to ``<out>.partial.jsonl`` (see the module docstring)."""

    def __init__(self, out: str | os.PathLike[str], header: dict[str, Any]) -> None:
        self.path = journal_path(out)
        self.header = json.loads(json.dumps({"format": FORMAT, "version": VERSION} | header))

    def start(self) -> dict[int, EpisodeRecord]:
        """Resume a journal with the same header (returns its ``ok`` records by episode) or start
        a new one; either way the file then holds the header and the records kept."""
        kept = self._read() if self.path.exists() else {}
        lines = [self.header, *(kept[e].to_dict() for e in sorted(kept))]
        atomic_write_text(self.path, "".join(json.dumps(line) + "\n" for line in lines))
        if kept:
            log.info("%s: resuming with %d finished episodes", self.path, len(kept))
        return kept

    def _read(self) -> dict[int, EpisodeRecord]:
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except ValueError:
            header = None
        if header != self.header:
            log.warning("%s: left by an evaluation with other settings; starting over", self.path)
            return {}
        seeds, kept = self.header["seeds"], {}
        for line in lines[1:]:
            try:  # the last line may be torn by a crash: that episode runs again
                rec = EpisodeRecord.from_dict(json.loads(line))
            except (ValueError, TypeError, KeyError):
                continue
            if rec.status == "ok" and 0 <= rec.episode < len(seeds) and rec.env_seed == seeds[rec.episode]:
                kept[rec.episode] = rec
        return kept

    def append(self, record: EpisodeRecord) -> None:
        """Add one finished episode, durably (flush + fsync); a full disk names the journal."""
        with naming_path(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record.to_dict()) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
