"""NeuMF's training pieces (the neural_cf channel): optimisers with sparse embedding gradients, NeuMF initialised
from pre-trained GMF and MLP (He et al. 2017, §3.4.1), and the L2 penalty on a batch's embedding rows."""

from __future__ import annotations

import torch

from common.towers.neural_cf import NeuMFTower
from trainer.nn.loop import LoopConfig, adam


def optimizers(net: NeuMFTower, kind: str, cfg: LoopConfig, sparse: bool) -> list[torch.optim.Optimizer]:
    """Adam (or SGD) over the whole model; with `sparse`, the embedding tables get sparse gradients and SparseAdam
    (dense Adam would update every row of big tables at every step), the MLP and output layer Adam."""
    net.set_sparse(sparse and kind == "adam")
    if kind == "sgd":
        return [torch.optim.SGD(net.parameters(), lr=cfg.lr)]
    if not sparse:
        return [adam(net.parameters(), cfg)]
    tables = {id(e.weight) for e in net.embeddings()}
    return [torch.optim.SparseAdam([e.weight for e in net.embeddings()], lr=cfg.lr),
            adam([w for w in net.parameters() if id(w) not in tables], cfg)]


def init_from_pretrained(net: NeuMFTower, gmf: NeuMFTower, mlp: NeuMFTower, alpha: float) -> None:
    """NeuMF from pre-trained GMF and MLP (paper §3.4.1): embeddings and MLP layers copied, output weights
    h = [α h_GMF ; (1−α) h_MLP] and bias α b_GMF + (1−α) b_MLP."""
    with torch.no_grad():
        for name in ("gmf_user", "gmf_item", "gmf_hist"):
            if getattr(net, name) is not None:
                getattr(net, name).weight.copy_(getattr(gmf, name).weight)
        for name in ("mlp_user", "mlp_item", "mlp_hist", "tower"):
            if getattr(net, name) is not None:
                getattr(net, name).load_state_dict(getattr(mlp, name).state_dict())
        d = net.dim
        net.predict.weight[0, :d] = alpha * gmf.predict.weight[0]
        net.predict.weight[0, d:] = (1 - alpha) * mlp.predict.weight[0]
        net.predict.bias.copy_(alpha * gmf.predict.bias + (1 - alpha) * mlp.predict.bias)


def embedding_l2(net: NeuMFTower, uid: torch.Tensor, rec: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Mean squared norm of the embedding rows a batch uses (per example)."""
    u = torch.clamp(uid, max=net.n_users)
    total = torch.zeros(())
    for user_t, item_t, hist_t in ((net.gmf_user, net.gmf_item, net.gmf_hist), (net.mlp_user, net.mlp_item,
                                                                               net.mlp_hist)):
        if user_t is None:
            continue
        total = total + user_t(u).pow(2).sum(1).mean() + item_t(items).pow(2).sum(-1).sum(1).mean()
        if hist_t is not None and rec.shape[1]:
            total = total + hist_t(torch.clamp(rec, max=net.n_items)).pow(2).sum(-1).sum(1).mean()
    return total
