"""`python -m report RUN_DIR [RUN_DIR ...]`: draw each run folder's pictures and tables from its files
(report.render); train.py's command line calls it at the end of every run unless --no-report."""
from dataclasses import dataclass

from cli import Parser, add_options, check_options, config_from, option, run
from report.render import render
from training.device import DEVICES


@dataclass
class Config:
    """The options of python -m report; the run folders are positional."""
    data: str = option("", "the runs' ingested dataset, if it moved (default: the one in each run's config.json)")
    device: str = option("auto", "where the model runs for the feature maps and predictions: auto (cuda when "
                         "present), cpu or cuda", choices=DEVICES)
    quiet: bool = option(False, "no progress bars")


def main(argv=None):
    parser = add_options(Parser(description=__doc__.splitlines()[0]), Config)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders made by train.py")
    args = parser.parse_args(argv)
    cfg = config_from(Config, args)
    check_options(cfg)
    for run_dir in args.runs:
        written = render(run_dir, data=cfg.data, device=cfg.device, progress=not cfg.quiet)
        print(f"report: {len(written)} files in {run_dir}")
    return 0


if __name__ == "__main__":
    run(main)
