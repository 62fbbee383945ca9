"""The data pipeline: dataset specs -> documents -> GPT-2 tokens on disk -> random training windows."""

from dist_gpt.data.loader import TokenLoader
from dist_gpt.data.prepare import prepare_dataset, read_meta
from dist_gpt.data.sources import open_source
from dist_gpt.data.sword import read_chapters, read_verses

__all__ = ["TokenLoader", "open_source", "prepare_dataset", "read_chapters", "read_meta", "read_verses"]
