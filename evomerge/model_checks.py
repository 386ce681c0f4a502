"""Model checks a search runs before its run folder exists, with errors that name the field.

The merge engine's :class:`~evomerge.merge.model_folder.ModelFolder` errors name the folder; in a
search the user also needs the space-file field that pointed there (``models.donors[1]``), so
:class:`ModelFields` adds it. :func:`check_loadable` asks transformers whether it can build the
model the workers will build, honouring ``trust_remote_code``: a model that needs code shipped
with it is refused here, in seconds, instead of killing every worker after the run has started.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import ModelError
from .merge.model_folder import ModelFolder


class ModelFields:
    """The space file's model references and the field that names each one."""

    def __init__(self, source: str, base: str, donors: list[str]) -> None:
        self.source = source
        self.field = {base: "models.base", **{d: f"models.donors[{i}]" for i, d in enumerate(donors)}}

    @property
    def references(self) -> list[str]:
        return list(self.field)

    @contextmanager
    def naming(self, reference: str | None = None) -> Iterator[None]:
        """Re-raise a ModelError prefixed with the file and field (``models`` for all of them)."""
        try:
            yield
        except ModelError as err:
            where = self.field[reference] if reference is not None else "models"
            raise ModelError(f"{self.source}: {where}: {err}") from None

    def open(self, reference: str) -> ModelFolder:
        with self.naming(reference):
            return ModelFolder(reference)


def model_fields(config: Any) -> ModelFields:
    return ModelFields(config.source, config.models.base, [d.model for d in config.models.donors])


def check_loadable(folder: ModelFolder, *, trust_remote_code: bool) -> None:
    """Refuse a model transformers cannot build as the workers will build it.

    Without ``trust_remote_code`` transformers never imports code from the folder; a model whose
    architecture exists only as such code is refused with the fix. With it (the space file's
    ``trust_remote_code: true``) the code is imported here, as the workers will import it.
    """
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(folder.path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as err:
        auto_map = folder.config.get("auto_map")
        if auto_map and not trust_remote_code:
            module = str(next(iter(auto_map.values()))).split(".")[0]
            raise ModelError(
                f"{folder.path}: its architecture ({folder.config.get('model_type')!r}) is defined by code shipped "
                f"with the model ({module}.py), which evomerge does not run by default. Read that code; if you "
                "trust it, set trust_remote_code: true in the space file"
            ) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{folder.path}: transformers cannot build this model ({first}); check its config.json") from None


def check_tokenizer(folder: ModelFolder, *, trust_remote_code: bool) -> None:
    """The workers score with the base's tokenizer: refuse a base without a loadable one now."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(folder.path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"{folder.path}: no tokenizer transformers can load ({first[:300]}); copy the tokenizer files "
            "(tokenizer.json, tokenizer_config.json) of the model it was fine-tuned from into the folder"
        ) from None
