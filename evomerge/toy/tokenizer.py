"""The toy world's tokenizer: one token per character, built locally with ``tokenizers``.

A character vocabulary keeps the toy models tiny and makes every tokenisation trivially
consistent (``tok(a + b) == tok(a) + tok(b)``), so lm-eval's loglikelihood requests split context
and continuation exactly where the task says. Two details matter for lm-eval:

- lm-eval relies on the tokenizer to add BOS, so the post-processor prepends ``<s>`` to every
  encoding; the models are trained with that BOS too.
- the tokenizer is saved as a :class:`~transformers.PreTrainedTokenizerFast`, which every
  transformers version since 4.x loads with ``AutoTokenizer`` without custom code.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Every character any toy skill or the base's pretraining text uses; fixed so the vocabulary (and
# the embedding matrix shape) never depends on which data happened to be generated.
CHARACTERS = string.ascii_lowercase + string.digits + " :=+-.,>"


def build_tokenizer():
    """A fast character-level tokenizer that prepends BOS; ids: specials first, then CHARACTERS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split into single characters, spaces included (WordLevel would otherwise see whole words).
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=64,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(directory: Path) -> None:
    """Writes tokenizer.json and tokenizer_config.json into a model folder.

    transformers 5 records its own class name (``TokenizersBackend``) and a ``backend`` key, which
    transformers 4.x (and tools pinned to it) cannot load; ``PreTrainedTokenizerFast`` loads in both.
    """
    build_tokenizer().save_pretrained(str(directory))
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
