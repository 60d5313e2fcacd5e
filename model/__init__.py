"""holorec's PyTorch core: models behind one protocol, data, training, evaluation, checkpoints."""
from __future__ import annotations

from torch import Tensor

from model.protocol import ModelConfig, SeqRecModel, State


def build_model(config: ModelConfig, item_attrs: Tensor | None = None) -> SeqRecModel:
    """The one place a model name becomes a class."""
    from model.holomamba import HoloMambaRec

    models: dict[str, type[SeqRecModel]] = {"holomamba": HoloMambaRec}
    try:
        from model.sasrec import SASRec
        from model.gru4rec import GRU4Rec
        from model.elastic import Elastic

        models |= {"sasrec": SASRec, "gru4rec": GRU4Rec, "elastic": Elastic}
    except ImportError:
        pass
    if config.model not in models:
        raise ValueError(f"unknown model {config.model!r}; choose from {sorted(models)}")
    return models[config.model](config, item_attrs)


__all__ = ["ModelConfig", "SeqRecModel", "State", "build_model"]
