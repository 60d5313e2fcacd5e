"""holorec's PyTorch core: models behind one protocol, data, training, evaluation, checkpoints."""
from __future__ import annotations

from torch import Tensor

from model.protocol import ModelConfig, SeqRecModel, State

MODELS = ("holomamba", "sasrec", "gru4rec", "elastic")  # the one list of model names


def build_model(config: ModelConfig, item_attrs: Tensor | None = None) -> SeqRecModel:
    """The one place a model name becomes a class."""
    from model.elastic import Elastic
    from model.gru4rec import GRU4Rec
    from model.holomamba import HoloMambaRec
    from model.sasrec import SASRec

    classes: dict[str, type[SeqRecModel]] = {"holomamba": HoloMambaRec, "sasrec": SASRec, "gru4rec": GRU4Rec, "elastic": Elastic}
    if config.model not in classes:
        raise ValueError(f"unknown model {config.model!r}; choose from {sorted(classes)}")
    return classes[config.model](config, item_attrs)


__all__ = ["MODELS", "ModelConfig", "SeqRecModel", "State", "build_model"]
