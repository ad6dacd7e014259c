"""The channel contract (tests/channel_contract.py), run for EVERY model found by the registry: a new channel is
picked up automatically, with the generic small settings unless CONTRACT_PARAMS names its own.

A model's own test file may also subclass `ChannelContract` directly (e.g. with other params); the classes here
are built only for the registry's models, and one more, `TestTwoInterestContract`, runs the contract on a
planted embedding model with two interest vectors per user ([n_users, 2, d] user vectors).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

from tests.channel_contract import ChannelContract, planted_data
from trainer.channels import registry
from trainer.channels.embedding import EmbeddingChannel
from trainer.data.train_data import TrainData

MODELS = sorted(registry.models())

# Per-model small settings (the rest get channel_contract.small_params).
CONTRACT_PARAMS: dict[str, dict] = {
    "mf": {"dim": 8, "epochs": 3, "num_threads": 1, "top_k": 20},
    "item2vec": {"dim": 8, "epochs": 2, "workers": 1, "top_k": 20},
    "itemcf": {"top_k": 20, "position_decay": 0.9, "backward_weight": 0.7, "category_weight": 1.2},
    "usercf": {"top_k": 20, "region_weight": 1.5},
    "popular": {"top_k": 30},
}
# Models whose two seeded fits may differ slightly (e.g. multi-threaded training), with the allowed
# absolute tolerance on scores/vectors. Everything else must be bit-identical.
APPROX: dict[str, float] = {}


def _class_name(model: str) -> str:
    return "Test" + "".join(part.title() for part in model.split("_")) + "Contract"


for _model in MODELS:
    globals()[_class_name(_model)] = type(_class_name(_model), (ChannelContract,), {
        "model": _model, "params": CONTRACT_PARAMS.get(_model), "approx": APPROX.get(_model),
        "__doc__": f"The channel contract for model {_model!r}."})


class PlantedInterestsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: int = 20


class PlantedInterests(EmbeddingChannel):
    """A test model with K = 2 interests per user: its own cluster's direction and (scaled by 0.9) the next
    cluster's; users with fewer than 8 clicks get one live interest. Not in the registry (empty `model`)."""

    model = ""
    kinds = ("u2i", "i2i")
    Params = PlantedInterestsParams

    def fit(self, data: TrainData, progress: bool = False) -> None:
        cluster = np.array([int(x[1:]) // 10 for x in data.item_map.ids])
        eye = np.eye(4, dtype=np.float32)
        self.item_vectors = eye[cluster] + 0.01 * np.arange(data.n_items, dtype=np.float32)[:, None] / data.n_items
        self.user_vectors = np.zeros((data.n_users, 2, 4), np.float32)
        self.interest_counts = np.zeros(data.n_users, np.int32)
        for u in range(data.n_users):
            items, _ = data.history(u)
            if len(items):
                main = int(np.bincount(cluster[items], minlength=4).argmax())
                self.user_vectors[u, 0] = eye[main]
                self.user_vectors[u, 1] = 0.9 * eye[(main + 1) % 4]
                self.interest_counts[u] = 2 if len(items) >= 8 else 1


class TestTwoInterestContract(ChannelContract):
    model = "planted_interests"
    channel_class = PlantedInterests
    params = {}


def test_registry_finds_the_classic_channels():
    assert {"itemcf", "usercf", "popular", "mf", "item2vec"} <= set(MODELS)
    for model in MODELS:
        assert issubclass(globals()[_class_name(model)], ChannelContract)


def test_two_interest_model_answers_from_both_interests():
    data = planted_data()
    ch = TestTwoInterestContract.build()
    ch.fit(data)
    art = ch.artifacts(data)["u2i"]
    assert art.n_interests == 2 and art.user_vectors.shape == (data.n_users, 2, 4)
    cluster = np.array([int(x[1:]) // 10 for x in data.item_map.ids])
    u = data.user_map.get("u00")  # cluster 0 and 8 clicks: both interests live
    assert ch.interest_counts[u] == 2
    (ids, _), = ch.recommend(data, np.array([u]), k=10, kind="u2i")
    assert {0, 1} <= set(cluster[ids].tolist())
