"""murajax's command line from a checkout: the same as the installed ``murajax`` command.

    python launch.py                                   # the demo: synthetic MURA, tiny DenseNet
    python launch.py --config=default --config.data.root=/data/MURA-v1.1 --workdir runs/mura
    python launch.py --mode=evaluate --workdir runs/mura
    python launch.py --mode=predict --workdir runs/mura --input study_dir --output out --cam

Flags, config names and everything else: murajax/cli.py (``murajax --help``).
"""

from murajax.cli import main

if __name__ == "__main__":
    main()
