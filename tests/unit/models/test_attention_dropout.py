"""``model.attention_dropout``: the dropout on attention probabilities, set on the running modules only.

Relational: with attention dropout 0 (and hidden dropout 0), a model in training mode computes what it
computes in eval mode; with the model's own attention dropout it does not. Hidden-state dropout and the
config (what ``config.json`` will say) are left alone.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from embedtune.errors import ConfigError
from embedtune.models.biencoder import set_attention_dropout

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)

# model type -> config kwargs that put attention dropout at 0.5 and hidden dropout at 0
FAMILIES = {
    "bert": dict(attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.0),
    "roberta": dict(attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.0, pad_token_id=1),
    "mpnet": dict(attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.0),
    "distilbert": dict(attention_dropout=0.5, dropout=0.0, dim=32, n_layers=2, n_heads=4, hidden_dim=64),
    "llama": dict(attention_dropout=0.5, num_key_value_heads=2),
}


def _model(model_type: str, attn: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SMALL, **FAMILIES[model_type])
    return AutoModel.from_config(config, attn_implementation=attn)


def _hidden(model: nn.Module, train: bool) -> torch.Tensor:
    model.train(train)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_training_without_attention_dropout_computes_what_eval_computes(model_type, attn):
    if model_type == "mpnet" and attn == "sdpa":
        pytest.skip("transformers' MPNet has eager attention only")
    model = _model(model_type, attn)
    reference = _hidden(model, train=False)
    torch.manual_seed(2)
    assert not torch.allclose(_hidden(model, train=True), reference, atol=1e-3)  # the dropout is live

    before = set_attention_dropout(model, 0.0)

    assert before == 0.5
    torch.manual_seed(2)
    torch.testing.assert_close(_hidden(model, train=True), reference, atol=2e-5, rtol=1e-5)
    key = "attention_dropout" if model_type in ("distilbert", "llama") else "attention_probs_dropout_prob"
    assert getattr(model.config, key) == 0.5  # config.json keeps the checkpoint's value


def test_hidden_dropout_is_left_as_the_model_has_it():
    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", **SMALL, attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.3)
    model = AutoModel.from_config(config)

    set_attention_dropout(model, 0.0)

    ps = {name: m.p for name, m in model.named_modules() if isinstance(m, nn.Dropout)}
    attention = {n: p for n, p in ps.items() if n.endswith("attention.self.dropout")}
    assert len(attention) == 2 and set(attention.values()) == {0.0}
    hidden = {n: p for n, p in ps.items() if n not in attention}
    assert hidden and set(hidden.values()) == {0.3}


def test_a_model_with_no_attention_layer_to_set_is_refused_by_name():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = AutoConfig.for_model("bert", **SMALL)  # says 0.1 ...
            self.mixer = nn.Linear(4, 4)  # ... but has no attention module embedtune knows

    with pytest.raises(
        ConfigError, match=r"model.attention_dropout: found no attention layer .*'bert'.*null"
    ):
        set_attention_dropout(Odd(), 0.0)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        set_attention_dropout(_model("bert"), 1.0)


def test_a_model_whose_config_names_no_attention_dropout_is_said_so(capsys):
    """The print says "set to", not "None -> 0.0", when the config has no attention-dropout key."""
    from torch import nn

    from embedtune.training.parallel import Parallel
    from embedtune.training.tasks import apply_attention_dropout

    class ToyAttention(nn.Module):
        attention_dropout = 0.2

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = ToyAttention()

    toy = Toy()
    apply_attention_dropout(toy, 0.0, Parallel.from_env(device="cpu"))
    assert toy.attn.attention_dropout == 0.0
    out = capsys.readouterr().out
    assert (
        "attention dropout set to 0.0 while training (model.attention_dropout; the config names none)" in out
    )
