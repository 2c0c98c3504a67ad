"""Demo tokenizer: a byte-level BPE trained on the demo corpus, saved as a Hugging Face tokenizer dir."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

SPECIAL_TOKEN = "<|endoftext|>"  # BOS, EOS, PAD and UNK at once (as GPT-2)
VOCAB_SIZE = 2048
# Documents are tokenized whole and cut into windows by the caller (TransformerLens truncates to n_ctx).
MODEL_MAX_LENGTH = 1_000_000


def train_tokenizer(docs: list[str], out_dir: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Train a byte-level BPE on `docs` and save it to `out_dir` so that
    `transformers.AutoTokenizer.from_pretrained(out_dir)` loads it offline.

    The special token `<|endoftext|>` gets id 0 and serves as BOS, EOS, PAD and UNK. The tokenizer
    adds no special tokens by itself (like GPT-2): TransformerLens prepends BOS when asked.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    # Older transformers releases look for these two; v5 no longer writes them.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["add_bos_token"] = False
    config["add_eos_token"] = False
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    special = dict.fromkeys(("bos_token", "eos_token", "pad_token", "unk_token"), SPECIAL_TOKEN)
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    logger.info("tokenizer: vocab %d saved to %s", tok.get_vocab_size(), out_dir)


def load_tokenizer(tokenizer_dir: Path):  # -> PreTrainedTokenizerFast
    """Load the demo tokenizer offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
