"""Load a task's jsonl from beside its YAML, so the task works from any working directory.

lm-eval 0.4.13 hands `dataset_kwargs.data_files` straight to `datasets.load_dataset`, which
resolves a relative path against the current directory, not the YAML's. A task that names
`custom_dataset: !function local_jsonl.load` gets this function instead; lm-eval calls it with
the task's metadata, where it puts `config_source` (the YAML's path), and with `dataset_kwargs`.
"""

from pathlib import Path

import datasets


def load(config_source: str, data_files: dict[str, str], **_metadata) -> datasets.DatasetDict:
    here = Path(config_source).parent
    files = {split: str(here / name) for split, name in data_files.items()}
    return datasets.load_dataset("json", data_files=files)
