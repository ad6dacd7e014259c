"""User towers: pure forward code that the trainers (which train them) and the vector server (which rebuilds them
from a published state dict) both import. No training code here, and no import of `trainer` or `services`.

    inputs.py          the request-time input encoding (ids, attributes, recent items and their times)
    base.py            `Tower`: an nn.Module with an architecture tag and JSON hyper-parameters
    layers.py          forward-only layers (SENet, MLP, masked-mean pooling)
    two_tower_user.py  arch "two_tower_user"   (trainer/channels/two_tower.py)
    recent_decay.py    arch "recent_decay"     (a baseline; the vector server's test and benchmark tower)
    registry.py        ARCHS (arch → builder), export (state dict + meta) and the strict weights-only load
    numpy_twin.py      TWINS (arch → numpy forward builder) and `matches`, the load-time check of a twin
"""

from common.towers.base import Tower
from common.towers.inputs import TowerInputs, encode_user_inputs, history_inputs, input_meta, recent_matrix
from common.towers.numpy_twin import TWINS, TowerFn, matches, numpy_twin
from common.towers.registry import (
    ARCHS,
    TowerError,
    build_tower,
    export_tower,
    load_tower,
    read_state,
    tower_bytes,
    tower_meta,
)

__all__ = ["ARCHS", "TWINS", "Tower", "TowerError", "TowerFn", "TowerInputs", "build_tower", "encode_user_inputs",
           "export_tower", "history_inputs", "input_meta", "load_tower", "matches", "numpy_twin", "read_state",
           "recent_matrix", "tower_bytes", "tower_meta"]
