"""The `pum` console script: one command, subcommands per role."""


def main(argv=None):
    from pum.common import errors  # noqa: F401

    print("pum ok")
