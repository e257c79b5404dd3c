"""`gateway site …`: provision the site broker's users (a user per device, the gateway's)."""

from __future__ import annotations

from pathlib import Path

import click

from gateway.cli.options import config_option, load
from gateway.cli.output import fail
from gateway.errors import FieldgateError
from gateway.site import DEFAULT_PASSWORD_FILE


@click.group("site")
def site_group() -> None:
    """Provision the site broker: a user per device, the gateway's user.

    deploy/mosquitto-site.conf and deploy/mosquitto-site.acl lock the site broker down:
    each device may publish only as itself and read only its own commands.
    """


_password_file_option = click.option(
    "--password-file", type=click.Path(dir_okay=False, path_type=Path),
    default=str(DEFAULT_PASSWORD_FILE), show_default=True,
    help="Mosquitto password file (password_file in mosquitto-site.conf).")
_replace_option = click.option("--replace", is_flag=True,
                               help="Give a user that exists a new password.")
_RELOAD = "reload Mosquitto to use it: sudo systemctl reload mosquitto"


@site_group.command("add-device")
@click.argument("device")
@config_option
@_password_file_option
@_replace_option
def site_add_device(device: str, config_path: Path, password_file: Path,
                    replace: bool) -> None:
    """Add DEVICE to the site broker; print its password and command key.

    The device connects with user name DEVICE and the password printed; it verifies
    commands and signs its answers with the command key printed (derived from the
    gateway's commands.key_file). Both are shown once: put them on the device.

    DEVICE is an id ingest accepts: up to ingest.max_device_id ASCII letters, digits and
    _ . - @ ~ (not "." or ".." alone); ':', which ingest accepts, cannot be in a Mosquitto
    user name.

    \b
    Example:
      sudo gateway site add-device gh-7 -c /etc/fieldgate/gateway.yaml
    """
    from gateway.site import add_device

    cfg = load(config_path)
    try:
        done = add_device(password_file, device, cfg.commands.key(),
                          max_device_id=cfg.ingest.max_device_id, replace=replace)
    except (FieldgateError, OSError) as err:
        fail(err, 2)
    click.echo(f"{device!r} added to {str(password_file)!r}; {_RELOAD}", err=True)
    click.echo(f"username:    {done.user}")
    click.echo(f"password:    {done.password}")
    unsigned = "none (commands.key_file is not set: commands go unsigned)"
    click.echo(f"command key: {done.command_key or unsigned}")


@site_group.command("add-gateway")
@_password_file_option
@_replace_option
def site_add_gateway(password_file: Path, replace: bool) -> None:
    """Add the gateway's own user ("fieldgate") to the site broker; print its password.

    Put the password in the file that site.password_file names, and set
    site.username: fieldgate in the gateway's config.

    \b
    Example:
      sudo gateway site add-gateway | sed -n 's/^password: *//p' |
        sudo install -o fieldgate -m 400 /dev/stdin /etc/fieldgate/site.pw
    """
    from gateway.site import add_gateway

    try:
        done = add_gateway(password_file, replace=replace)
    except (FieldgateError, OSError) as err:
        fail(err, 2)
    click.echo(f"{done.user!r} added to {str(password_file)!r}; {_RELOAD}", err=True)
    click.echo(f"username:    {done.user}")
    click.echo(f"password:    {done.password}")
