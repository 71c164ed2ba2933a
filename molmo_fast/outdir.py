"""Output directories: never delete, or write into, what molmo_fast did not write.

Every command that writes a directory (export, data build, synthetic sets, eval and study outputs, training run
dirs) goes through this module. A directory we write carries a marker file, `.molmo_fast_output.json`, naming the
kind of output, the parameters of a keyed set and, for outputs published in one piece, the files written. Rules:

- an existing non-empty directory without our marker, or with another kind's marker, is refused, untouched;
- an output is never written into (the same directory) or above a protected path: a run directory, the command's
  own input;
- a complete output is built in a hidden temporary sibling and renamed into place (`atomic_output_dir`). With
  `overwrite` it replaces our earlier output of the same kind, which is removed only once the new one is in place,
  and only if it holds no file we did not write;
- outputs that grow in place (eval predictions, training runs) claim their directory with `claim_output_dir`.

This module sits at the bottom of the stack: it imports nothing of molmo_fast.
"""

import json
import os
import shutil
import socket
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MARKER = ".molmo_fast_output.json"
KINDS = ("export", "data_build", "synthetic", "eval", "study", "train_run")

PathLike = str | os.PathLike
Protected = Mapping[PathLike, str] | Iterable[PathLike]


class OutputDirError(ValueError):
    """An output directory that molmo_fast refuses to write."""


def read_marker(path: PathLike) -> dict[str, Any] | None:
    """The marker of a directory molmo_fast wrote, or None (no marker, or a file that is not ours)."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("written_by") != "molmo_fast" or marker.get("kind") not in KINDS:
        return None
    return marker


def is_own_output(path: PathLike, kind: str, params: dict | None = None) -> bool:
    """Whether `path` holds our output of `kind` (with exactly `params`, when given)."""
    marker = read_marker(path)
    return marker is not None and marker["kind"] == kind and (params is None or marker.get("params") == params)


def check_output_dir(path: PathLike, kind: str, *, params: dict | None = None, protected: Protected = (),
                     overwrite: bool = False, reuse: bool = False,
                     overwrite_hint: str = "pass --overwrite to replace it") -> Path:
    """Raises `OutputDirError` unless `path` may receive a `kind` output; writes nothing. Returns the path.

    Accepted: an absent or empty directory; our own `kind` output with the same `params` when `reuse` (a
    grow-in-place output continued) or `overwrite`; with `overwrite` also one with other `params`. `protected`
    paths (optionally mapped to what they are, for the message) may be neither `path` nor inside it.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}, expected one of {KINDS}")
    out = Path(path)
    resolved = out.resolve()
    items = protected.items() if isinstance(protected, Mapping) else ((p, "a protected path") for p in protected)
    for p, what in items:
        p = Path(p).resolve()
        if p == resolved or resolved in p.parents:
            where = "into" if p == resolved else "above"
            raise OutputDirError(f"{out}: refusing to write a {kind} output {where} {p} ({what}); choose a "
                                 f"directory outside it")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out}: exists and is not a directory; refusing to replace it with a {kind} output")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    marker = read_marker(out)
    if marker is None:
        raise OutputDirError(f"{out}: refusing to write a {kind} output into a non-empty directory molmo_fast did "
                             f"not write (it holds {_describe(out)}); choose another directory")
    if marker["kind"] != kind:
        raise OutputDirError(f"{out}: holds a molmo_fast {marker['kind']} output, not a {kind} output; refusing to "
                             f"replace it; choose another directory")
    same = params is None or marker.get("params") == params
    if (same and reuse) or overwrite:
        return out
    what = f"a molmo_fast {kind} output" + ("" if same else f" with {marker.get('params')} (asked for {params})")
    raise OutputDirError(f"{out}: already holds {what}; {overwrite_hint}")


def claim_output_dir(path: PathLike, kind: str, *, params: dict | None = None, protected: Protected = (),
                     reuse: bool = False, overwrite_hint: str = "pass --overwrite to replace it") -> Path:
    """Checks `path` (see `check_output_dir`), creates it and marks it ours: for outputs that grow in place."""
    out = check_output_dir(path, kind, params=params, protected=protected, reuse=reuse,
                           overwrite_hint=overwrite_hint)
    out.mkdir(parents=True, exist_ok=True)
    if read_marker(out) is None:
        _write_marker(out, kind, params, files=None)
    return out


def remove_own_output(path: PathLike, kind: str) -> bool:
    """Deletes `path` only if it is our `kind` output (e.g. a run dir whose start failed); returns whether it did."""
    if not is_own_output(path, kind):
        return False
    shutil.rmtree(path)
    return True


@contextmanager
def atomic_output_dir(path: PathLike, kind: str, *, params: dict | None = None, protected: Protected = (),
                      overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary directory to write a complete `kind` output into; on success it becomes `path`.

    The checks run before anything is written and again just before the swap. A failure (or exception in the
    body) removes the temporary directory and leaves `path` as it was.
    """
    out = check_output_dir(path, kind, params=params, protected=protected, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out)
    tmp = out.with_name(f".{out.name}.tmp-{_owner()}")
    if tmp.exists() and not remove_own_output(tmp, kind):
        raise OutputDirError(f"{tmp}: exists and is not ours; remove it or choose another output directory")
    tmp.mkdir()
    try:
        _write_marker(tmp, kind, params, files=None)
        yield tmp
        files = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if not f.is_dir() and f.name != MARKER)
        _write_marker(tmp, kind, params, files=files)
        _swap_in(tmp, out, kind, params, protected, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, out: Path, kind: str, params: dict | None, protected: Protected, overwrite: bool) -> None:
    check_output_dir(out, kind, params=params, protected=protected, overwrite=overwrite)
    if not out.is_dir():
        os.rename(tmp, out)
        return
    marker = read_marker(out)
    if marker is None:  # empty directory
        out.rmdir()
        os.rename(tmp, out)
        return
    if marker.get("files") is not None:
        ours = set(marker["files"]) | {MARKER}
        extra = sorted(str(f.relative_to(out)) for f in out.rglob("*") if not f.is_dir()
                       and str(f.relative_to(out)) not in ours)
        if extra:
            raise OutputDirError(f"{out}: holds files molmo_fast did not write ({', '.join(extra[:5])}"
                                 f"{', ...' if len(extra) > 5 else ''}); refusing to replace it; move them away")
    old = out.with_name(f".{out.name}.old-{_owner()}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old)


def _write_marker(path: Path, kind: str, params: dict | None, files: list[str] | None) -> None:
    marker = {"written_by": "molmo_fast", "kind": kind, "params": params, "files": files}
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path / MARKER)


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _remove_stale_siblings(out: Path) -> None:
    """Temporary siblings left by a crashed build on this host (its process is gone) and marked ours."""
    prefixes = tuple(f".{out.name}.{what}-{socket.gethostname()}-" for what in ("tmp", "old"))
    for sibling in out.parent.iterdir():
        pid = sibling.name.rsplit("-", 1)[-1]
        if not sibling.name.startswith(prefixes) or not pid.isdigit() or read_marker(sibling) is None \
                or _alive(int(pid)):
            continue
        shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(path: Path) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: {shown}"
