"""Other libraries' model formats: Hugging Face transformers folders, both ways (`llmmo export --format hf`,
`llmmo import`). Nothing here imports transformers at import time: exporting needs only safetensors, and
importing loads transformers (the `hf` extra) when it reads a folder's config.
"""

from llmmo.interop.hf_export import export_hf
from llmmo.interop.hf_import import download_from_hub, import_hf

__all__ = ["download_from_hub", "export_hf", "import_hf"]
