"""Gin file loading for every CLI: one search path (the given files' directories, the repo's gin/, the repo root)
and one parse. Gin is used only while a config is being built; the configs themselves are plain dataclasses."""

import logging
import re
from pathlib import Path

import gin

GIN_DIR = Path(__file__).resolve().parents[2] / "gin"

_REQUIRED_MACRO = re.compile(r"^(\w+)/macro\.value set to `%gin\.REQUIRED`")
_SEARCH_PATHS: list[str] = []  # gin keeps its search path across clear_config(); add each directory once


def _add_search_path(directory: Path) -> None:
    if str(directory) not in _SEARCH_PATHS:
        _SEARCH_PATHS.append(str(directory))
        gin.add_config_file_search_path(str(directory))


def parse_gin(gin_files: list[str], gin_params: list[str] | None = None) -> None:
    """Clears gin, then parses `gin_files` and `gin_params` (bindings) into gin's global state.

    `include` lines and file names resolve from the current directory, then each given file's directory, the
    repo's gin/ and the repo root, so `include 'tiny.gin'` works from any working directory."""
    gin.clear_config()
    for path in gin_files:
        if Path(path).is_file():
            _add_search_path(Path(path).resolve().parent)
    _add_search_path(GIN_DIR)
    _add_search_path(GIN_DIR.parent)
    # gin's package-resource reader logs "Path not found" for every search-path miss before the next path hits.
    quiet = logging.Filter()
    quiet.filter = lambda record: not str(record.msg).startswith("Path not found")
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(gin_params or []))
    except ValueError as e:
        required = _REQUIRED_MACRO.match(str(e))
        if required:  # gin's wording names its internal binding; say what to pass instead
            name = required.group(1)
            raise ValueError(f"gin macro {name} is required (the gin file sets it to %gin.REQUIRED): pass "
                             f"--gin_param '{name} = ...'") from None
        raise
    finally:
        logging.getLogger().removeFilter(quiet)
