"""Models that never have to fit in memory: weights read block by block from safetensors shards
(``weights``), hidden states kept between blocks in memory or files (``activations``), and the resumable
driver that prunes or scores a folder that way (``driver``)."""
