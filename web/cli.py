"""Operator commands: ``flask --app web.wsgi keys create|list|revoke|weight``."""
from __future__ import annotations

import json

import click
from flask import current_app
from flask.cli import with_appcontext

from shared.apikeys import MAX_WEIGHT, MIN_WEIGHT
from shared.netguard import RefusedUrl, resolve
from shared.signing import derive_secret

keys = click.Group("keys", help="Create, list and revoke API keys.")


def _services():
    return current_app.extensions["imgsvc"]


@keys.command("create")
@click.argument("name")
@click.option("--webhook-url", default=None, help="Default callback endpoint for this key's jobs.")
@click.option("--rate-limit", default=None, help='Overrides RATE_LIMIT for this key, e.g. "100/minute".')
@with_appcontext
def create_key(name: str, webhook_url: str | None, rate_limit: str | None) -> None:
    """Create a key and print it with its webhook secret (shown once; only a hash is stored)."""
    svc = _services()
    if not svc.settings.secret_key:
        raise click.ClickException("Set SECRET_KEY first: each key's webhook secret is derived from it.")
    if rate_limit:
        _check_rate(rate_limit)
    if webhook_url:
        try:  # the same guard every job's callback meets, so the key's jobs are not refused later
            resolve(webhook_url, allow_private=svc.settings.webhook_allow_private)
        except RefusedUrl as exc:
            raise click.ClickException(f"--webhook-url: {exc}") from None
    key, token = svc.keys.create(name, webhook_url=webhook_url, rate_limit=rate_limit)
    click.echo(json.dumps({**key.public(), "api_key": token,
                           "webhook_secret": derive_secret(svc.settings.secret_key, key.id)}, indent=2))
    click.echo("Store the api_key and webhook_secret now: they cannot be shown again.", err=True)


@keys.command("list")
@with_appcontext
def list_keys() -> None:
    """Print every key's id, name, limits and state (never the key)."""
    for key in _services().keys.list():
        click.echo(json.dumps(key.public()))


@keys.command("revoke")
@click.argument("key_id")
@with_appcontext
def revoke_key(key_id: str) -> None:
    """Revoke a key by id; requests with it get 401 from now on."""
    key = _services().keys.revoke(key_id)
    if key is None:
        raise click.ClickException(f"No key with id {key_id!r}.")
    click.echo(json.dumps(key.public()))


@keys.command("weight")
@click.argument("key_id")
@click.argument("weight", type=click.FloatRange(MIN_WEIGHT, MAX_WEIGHT))
@with_appcontext
def weigh_key(key_id: str, weight: float) -> None:
    """Set a key's fair-share weight (default 1): with weight 2 its work waits as if its backlog were half."""
    key = _services().keys.set_weight(key_id, weight)
    if key is None:
        raise click.ClickException(f"No key with id {key_id!r}.")
    click.echo(json.dumps(key.public()))


def _check_rate(value: str) -> None:
    from limits import parse_many

    try:
        parse_many(value)
    except ValueError as exc:
        raise click.ClickException(f"--rate-limit {value!r} is not a rate like '100/minute': {exc}") from None
