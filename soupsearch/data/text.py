"""Text splits: a table (Parquet, JSON lines, CSV, or a ``datasets`` ``save_to_disk``
folder) with a text column (and optionally a second one for sentence pairs) and labels,
tokenized once by the model's own tokenizer into ``int64 [N, k, L]`` (token ids, attention
mask, token type ids). String labels are mapped by ``label_map``, else by the model's
``label2id``; integer labels are class indices (or mapped by ``label_map`` when given)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from soupsearch.errors import DataError


def read_table(kind: str, path: str, columns: list[str]):
    """The ``columns`` of the table at ``path`` (a pyarrow Table)."""
    import pyarrow as pa

    where = f"dataset {kind}:{path}"
    p = Path(path)
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            from soupsearch.data.sources import _parquet_files

            table = pa.concat_tables([pq.read_table(f) for f in _parquet_files(path)])
        elif kind == "jsonl":
            import pyarrow.json as pj

            table = pj.read_json(str(p))
        elif kind == "csv":
            import pyarrow.csv as pc

            table = pc.read_csv(str(p))
        elif kind == "arrow":  # datasets' save_to_disk: state.json names the Arrow stream files
            state = p / "state.json"
            files = [p / f["filename"] for f in json.loads(state.read_text())["_data_files"]] if state.is_file() \
                else sorted(p.glob("*.arrow"))
            if not files:
                raise DataError(f"{where}: no state.json and no *.arrow files in {p} (expected a folder written by "
                                "datasets' save_to_disk)")
            tables = []
            for f in files:
                with pa.memory_map(str(f)) as src:
                    tables.append(pa.ipc.open_stream(src).read_all())
            table = pa.concat_tables(tables)
        else:  # pragma: no cover - config validation
            raise DataError(f"{where}: not a table format")
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{where}: {e.filename or p} does not exist") from None
    except Exception as e:  # noqa: BLE001 - pyarrow's parse errors are many types
        raise DataError(f"{where}: not readable as {kind} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{where}: no column {missing[0]!r}; columns present: {', '.join(table.column_names)}")
    return table


def load_text(cfg, preprocess) -> tuple[np.ndarray, np.ndarray, str]:
    """One configured text split, tokenized by ``preprocess`` (:class:`soupsearch.models.hf.TextPreprocess`)."""
    src = f"{cfg.type}:{cfg.path}"
    where = f"dataset {src}"
    if preprocess is None or not hasattr(preprocess, "tokenize"):
        raise DataError(f"{where}: text_column {cfg.text_column!r} makes it a text split, which needs the model's "
                        "tokenizer: a model.factory hf:<dir> text classifier with data.preprocess: model")
    cols = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else []) + [cfg.label_column]
    table = read_table(cfg.type, cfg.path, cols)
    if cfg.limit:
        table = table.slice(0, cfg.limit)
    if table.num_rows == 0:
        raise DataError(f"{where}: has 0 examples, expected at least 1")
    texts = table.column(cfg.text_column).to_pylist()
    pairs = table.column(cfg.text_pair_column).to_pylist() if cfg.text_pair_column else None
    for col, values in ((cfg.text_column, texts), (cfg.text_pair_column, pairs)):
        for i, v in enumerate(values or []):
            if not isinstance(v, str):
                raise DataError(f"{where}: row {i}: column {col!r} is {v!r}, expected a string")
    labels = table.column(cfg.label_column).to_pylist()
    cmap = cfg.label_map or cfg.class_map
    if cmap is None and any(isinstance(v, str) for v in labels):
        cmap = getattr(preprocess, "label2id", None) or None
        if cmap is None:
            raise DataError(f"{where}: column {cfg.label_column!r} holds strings ({labels[0]!r}, ...); give label_map "
                            "(label -> class index) or use a model whose config.json has label2id")
    y = np.empty(len(labels), dtype=np.int64)
    for i, v in enumerate(labels):
        if cmap is not None:
            if str(v) not in cmap:
                raise DataError(f"{where}: row {i}: label {v!r} is not in the label map ({', '.join(list(cmap)[:10])})")
            y[i] = int(cmap[str(v)])
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            y[i] = int(v)
        else:
            raise DataError(f"{where}: row {i}: label {v!r} in column {cfg.label_column!r}, expected an integer class")
    return preprocess.tokenize(texts, pairs), y, src
