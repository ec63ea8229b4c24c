"""What drives both stages: the console entry points (`entry_points`), the `student-train` command line as they run
it (`cli`: `student_train`'s subcommands and `demo`), and the end-to-end pipeline demo (`demo`).

The layers: `shared` (the cache format, data, models, losses) imports neither stage; `teacher_cache` and
`student_train` import `shared` and not each other; `stillroom` stands above them (`tests/test_layers.py`).

This module imports nothing: a spawned input worker imports the console script that started its parent, and with
it this package (see `stillroom.entry_points`).
"""
