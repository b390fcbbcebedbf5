"""Model loading: local Hugging Face folders, GGUF checkpoints, the embedded family."""

from proxytune.loading.gguf import load_gguf
from proxytune.loading.local import load_local
from proxytune.loading.embedded import load_embedded_family, verify_hashes
