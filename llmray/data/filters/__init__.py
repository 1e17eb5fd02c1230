"""Cleaning steps: text normalisers and document filters, each counting what it changed or dropped."""

from llmray.data.filters.base import Batch, Filter, Mapper, Step, run_steps
from llmray.data.filters.c4 import C4Filter
from llmray.data.filters.fineweb import FineWebFilter
from llmray.data.filters.gopher import GopherQualityFilter, GopherRepetitionFilter
from llmray.data.filters.length import LengthFilter
from llmray.data.filters.normalize import HtmlStrip, Normalize
from llmray.data.filters.pii import PiiRedact

__all__ = [
    "Batch", "C4Filter", "FineWebFilter", "Filter", "GopherQualityFilter", "GopherRepetitionFilter",
    "HtmlStrip", "LengthFilter", "Mapper", "Normalize", "PiiRedact", "Step", "run_steps",
]
