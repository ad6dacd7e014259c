"""The neural kit: what every neural model of the trainer shares (docs/channels.md, "How to add a model").

    encoding   one attribute encoder (categorical vocab + rare bucket, numeric quantile buckets, multi-valued
               bags, id-like columns dropped) for FM and every tower; its vocab is the user-tower contract
    layers     MLP tower, SENet, masked-mean and attention pooling over a padded history (the forward code of
               served towers lives in common/towers and is re-exported)
    losses     logits with logQ correction, softmax (in-batch, sampled, full), pointwise BCE with a negative
               ratio, triplet hinge / logistic, all with temperature
    negatives  count^power sampler, per-batch negative schemes, hard-negative mining, the logQ of each scheme,
               the streaming item-frequency estimator
    loop       the training loop: epochs, batches, optimiser, seed and threads, progress, early stop
"""
