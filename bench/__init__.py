"""internvl-bench: the original system's performance sweep, side by side with transformers.

- `cli.py`: the command; measures the machine's memory bandwidth, runs each engine in its
  own subprocess (`worker.py`), writes `benchmark.csv` + `benchmark.json`, prints the table.
- `ours.py`: the sweep over a compiled artifact (runtime.Engine).
- `hf.py`: the same sweep in transformers' InternVLForConditionalGeneration, with the
  artifact's own weights (`hf_weights.py` un-fuses and renames them).
- `measure.py`: bandwidth, peak memory, step statistics, the roofline.
"""
