"""Secrets kept out of run files: the values of keys and flags that name a token, key, secret or
password are written as ``"***"``.

A run file records the command line and the hyper-parameters, and both often carry credentials
(``--hf_token=hf_...``, ``config["wandb_api_key"]``). A name matches when it contains ``token``,
``key``, ``secret``, ``password`` or ``passwd``, in any case. In a config only text is hidden: a
number or a flag under such a name (``pad_token_id``, ``num_key_value_heads``) is no secret.
"""

from __future__ import annotations

import re

REDACTED = "***"

_SECRET = re.compile(r"token|key|secret|passw(or)?d", re.IGNORECASE)


def secret_name(name: str) -> bool:
    """Whether ``name`` names a credential (``hf_token``, ``API_KEY``, ``db-password``, ...)."""
    return _SECRET.search(name) is not None


def redact_argv(argv: list[str]) -> list[str]:
    """A copy of a command line whose secret values are ``***``.

    Forms: ``--hf_token=X`` and ``--hf_token X`` (flags), ``api_key=X`` (Hydra-style overrides).
    """
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not arg.startswith("-"):
            out.append(REDACTED)
            hide_next = False
            continue
        hide_next = False
        name, eq, _ = arg.partition("=")
        if eq and secret_name(name):
            out.append(f"{name}={REDACTED}")
        elif arg.startswith("-") and not eq and secret_name(arg):
            out.append(arg)
            hide_next = True
        else:
            out.append(arg)
    return out
