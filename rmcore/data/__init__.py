"""Data, from a file to a batch:

    files.py      file spec ──read──> records                  (.jsonl[.gz], .json, .parquet; slices; $RMCORE_DATA)
    formats.py    record ──parse (a FORMATS entry)──> Example(prompt, chosen, rejected) in HH form
    records.py    Example, Report (what was read, kept, dropped by reason), the field checks parsers share
    ranked_formats.py   the ranked formats' parsers: record ──> Example(prompt, responses, scores)
    template.py   Example ──Template.render──> the text the model sees
    datasets.py   text ──tokenizer──> ids ──length filter (dropped, counted)──> PairDataset / BlockDataset
    sampler.py    ShardedSampler: each rank's micro-batches, disjoint, resumable
    batching.py   collate_pairs / collate_blocks / collate_documents ──> tensors (one `pad` helper)
    ranked.py     rankings of K responses: tokenized, length-filtered (removals counted), packed (collate_ranked)
    tokenizer_training.py   a tokenizer trained on the data
"""
