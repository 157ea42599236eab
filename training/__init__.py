"""The parts of a training run that train.py's loop calls, one job a module: recipe (optimizer, schedules, the
fast recipe's pieces), resume (RNG states, where the epoch is), runfolder (files, checkpoints), device (ranks,
AMP), labels (--merge), lr_find, evaluate. train.py keeps the config, the setup and the loop itself; what a run
shows a person is drawn afterwards from its files (report/render.py)."""
