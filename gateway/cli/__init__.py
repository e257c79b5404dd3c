"""The `gateway` command: the top-level group and the table of its commands.

One module per command group; what they share is in ``options`` (the --config option,
reading that config, duration options) and ``output`` (how problems and failures reach the
user: one line each, exit 2 for the user's mistakes, 1 for failures while working).
Modules import only click and light parts of ``gateway`` at the top; anything heavy
(paho, the daemon, InfluxDB, rich) is imported inside its command, so `gateway --help`
stays fast on a Pi.
"""

from __future__ import annotations

import click

from gateway import __version__
from gateway.cli import cloud, demo, log, query, rules, run, site, status


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gateway")
def main() -> None:
    """Fieldgate: site MQTT -> durable log -> cloud MQTT.

    \b
    Example:
      gateway config sample > gateway.yaml   # edit it
      gateway check -c gateway.yaml
      gateway run -c gateway.yaml
    """


COMMANDS: tuple[click.Command, ...] = (
    run.run, run.check, run.config_group, demo.demo, status.status, site.site_group,
    rules.rules_group, log.log_group, query.query_group, cloud.cloud_group,
)
for _command in COMMANDS:
    main.add_command(_command)

__all__ = ["main"]
