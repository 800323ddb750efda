"""vmflow's benchmark suite: `python -m bench` runs every benchmark, `python -m bench NAME` one.

Every benchmark warms up, repeats, and prints medians and ratios measured in
the same run on the same machine. None of them passes or fails on an absolute
time; they fail only when something is lost or a run ends in the wrong state.
"""
