"""The experiments the parallel chapters run, on top of the algorithms.

Workers (``fn(rank, world_size, ...)`` for :func:`book.workers.launch.launch`), sweeps,
reference trainers on one process, the demo model and data, timelines and plots.
They live apart from the algorithms of ``llmcore.parallel``: the library never
imports this package; the chapters, labs, benchmarks and tests do.

* :mod:`.common`: the demo GPT and its Shakespeare batches, one-process references;
* :mod:`.data`: data parallelism and gradient compression (chapters 14 and 18);
* :mod:`.zero`: ZeRO and FSDP2 (chapter 15);
* :mod:`.tensor`: tensor and data x tensor parallelism (chapters 16 and 19);
* :mod:`.pipeline`: pipeline schedules and data x pipeline (chapters 17 and 19);
* :mod:`.context`: ring attention, context parallelism (chapter 16);
* :mod:`.timeline`: measured timelines of bucketed data parallelism and 1F1B, plots;
* :mod:`.memory`: bytes per parameter of training recipes, ZeRO's per rank, and the
  closed-form parameter count of a GPT (chapters 2, 11, 14, 15);
* :mod:`.activations`: activation memory per block, counted and measured;
* :mod:`.costmodel`, :mod:`.steptime`: what a parallel plan costs in memory and
  bytes, and how long its step takes (chapters 14-19).
"""
