"""Graph samplers (numpy, vectorised): CSR graphs, random walks, walks with restart, importance neighbourhoods,
personalised-PageRank ranks. See trainer/graph/walks.py."""

from trainer.graph.walks import (
    CSRGraph,
    bipartite,
    bipartite_step,
    csr_from_edges,
    drop_items,
    importance_neighbors,
    ppr_power,
    ppr_rank_window,
    random_walks,
    step,
    top_visited,
    uniform_neighbors,
    visit_counts,
    walks_with_restart,
)

__all__ = ["CSRGraph", "bipartite", "bipartite_step", "csr_from_edges", "drop_items", "importance_neighbors",
           "ppr_power", "ppr_rank_window", "random_walks", "step", "top_visited", "uniform_neighbors",
           "visit_counts", "walks_with_restart"]
