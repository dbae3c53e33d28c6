"""sentence-transformers directories (Reimers & Gurevych 2019, arXiv 1908.10084):
`modules.json` lists a pipeline such as Transformer -> Pooling -> Normalize, each
module in its own sub-folder (`1_Pooling/config.json`, ...). Only pipelines this
library reproduces exactly are accepted: a BERT transformer, "cls" or "mean"
pooling, and an optional L2 normalisation.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

_MODULES = ("Transformer", "Pooling", "Normalize")
# Pooling/config.json flags -> our `models.bert.pool` modes (None: not supported).
_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                  "pooling_mode_max_tokens": None, "pooling_mode_mean_sqrt_len_tokens": None,
                  "pooling_mode_weightedmean_tokens": None, "pooling_mode_lasttoken": None}


@dataclasses.dataclass(frozen=True)
class SentencePooling:
    """The pooling of a sentence-transformers pipeline: token vectors `[batch, seq, d]`
    -> sentence vectors `[batch, d]`."""
    mode: str                        # "cls" or "mean" (over real tokens only)
    normalize: bool                  # L2-normalise the pooled vector
    max_seq_length: int | None = None  # tokenizer truncation length
    transformer_dir: Path = Path(".")  # where config.json and the weights lie


def _read(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ValueError(f"{path} is named by modules.json but does not exist") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _pooling_mode(path: Path) -> str:
    cfg = _read(path / "config.json")
    if isinstance(cfg.get("pooling_mode"), str):  # newer sentence-transformers spell it out
        modes = [cfg["pooling_mode"]]
    else:
        modes = [flag for flag in _POOLING_FLAGS if cfg.get(flag)]
        modes = [_POOLING_FLAGS[m] or m for m in modes]
    if len(modes) != 1 or modes[0] not in ("cls", "mean"):
        raise ValueError(f"{path / 'config.json'} asks for pooling {modes}; supported: exactly "
                         "one of 'cls' (pooling_mode_cls_token) or 'mean' (pooling_mode_mean_tokens)")
    return modes[0]


def read_pipeline(directory: Path) -> SentencePooling | None:
    """The pooling of a sentence-transformers directory; None if it is not one."""
    if not (directory / "modules.json").exists():
        return None
    modules = _read(directory / "modules.json")
    kinds = {m["type"].rsplit(".", 1)[-1]: directory / m.get("path", "") for m in modules}
    unknown = [m["type"] for m in modules if m["type"].rsplit(".", 1)[-1] not in _MODULES]
    if unknown or "Transformer" not in kinds or "Pooling" not in kinds:
        raise ValueError(f"{directory / 'modules.json'} lists modules "
                         f"{[m['type'] for m in modules]}; supported: a Transformer, a Pooling "
                         f"and an optional Normalize (unsupported: {unknown})")
    transformer = kinds["Transformer"]
    st_config = {}
    for folder in (transformer, directory):
        if (folder / "sentence_bert_config.json").exists():
            st_config = _read(folder / "sentence_bert_config.json")
            break
    return SentencePooling(mode=_pooling_mode(kinds["Pooling"]), normalize="Normalize" in kinds,
                           max_seq_length=st_config.get("max_seq_length"),
                           transformer_dir=transformer)


def write_pipeline(directory: Path, pooling: str, normalize: bool, width: int,
                   max_seq_length: int) -> None:
    """modules.json + 1_Pooling/config.json (+ Normalize) next to an exported BERT."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (directory / "2_Normalize").mkdir(exist_ok=True)
    (directory / "1_Pooling").mkdir(exist_ok=True)
    flags = {flag: mode == pooling for flag, mode in _POOLING_FLAGS.items()}
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": width, **flags}, indent=2))
    (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    (directory / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2))
