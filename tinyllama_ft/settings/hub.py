"""Whether the model hub can give a model or dataset, asked once before the libraries ask: they retry an
unreachable hub for half a minute, logging each try, before their error. Here it is one request, answered or
given up within `TIMEOUT_S` in all, and one line naming the fix (`HF_HUB_OFFLINE=1` for what is already
downloaded, a local path)."""

from __future__ import annotations

import functools
import threading

from ..errors import UserError

TIMEOUT_S = 5.0  # in all: huggingface_hub may ask more than once (2.x first fetches a registry, 3 s of its own)


@functools.lru_cache(maxsize=None)  # a repository found once is not asked about again (a failure raises, uncached)
def check_on_hub(repo_id: str, kind: str = "model", flag: str = "--model_name_or_path") -> None:
    """Raise a one-line `UserError` when the hub cannot be reached or has no `kind` ("model" or "dataset") named
    `repo_id`. Nothing is asked with `HF_HUB_OFFLINE=1`: the libraries then read their cache at once."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return
    ask = HfApi().model_info if kind == "model" else HfApi().dataset_info
    try:
        within_deadline(lambda: ask(repo_id, timeout=TIMEOUT_S))
    except GatedRepoError:
        return  # the download says which access it needs
    except RepositoryNotFoundError:
        raise UserError(f"{kind} {repo_id!r} is not on the hub (or is private and no token is set): check "
                        f"{flag}, or pass a local {'folder' if kind == 'model' else 'file'}") from None
    except (HfHubHTTPError, HFValidationError):
        return  # the hub answered: the libraries report the rest in their own words
    except Exception as error:  # no connection, no name resolution, a timeout: the hub cannot be reached
        raise UserError(_unreachable(repo_id, kind, flag, error)) from None


def within_deadline(call) -> None:
    """`call()` on a thread of its own, waited for at most `TIMEOUT_S`; raises what it raised, or `TimeoutError`
    when it has not returned by then (the thread is left to end with the process: it holds nothing of ours)."""
    raised: list[BaseException] = []

    def run():
        try:
            call()
        except BaseException as error:  # noqa: BLE001 - handed to the caller, which sorts them
            raised.append(error)

    thread = threading.Thread(target=run, name="hub-check", daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    if thread.is_alive():
        raise TimeoutError(f"no answer in {TIMEOUT_S:.0f} s")
    if raised:
        raise raised[0]


def _unreachable(repo_id: str, kind: str, flag: str, error: Exception) -> str:
    from huggingface_hub import constants, try_to_load_from_cache

    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    where = f"cannot reach the hub at {constants.ENDPOINT} ({reason}) for the {kind} {repo_id!r}"
    cached = kind == "model" and isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    if cached:
        return f"{where}; it is downloaded already: set HF_HUB_OFFLINE=1 to use that copy without the network"
    return (f"{where}: connect to the network, or pass {flag} a local {'folder' if kind == 'model' else 'file'} "
            "(HF_HUB_OFFLINE=1 uses what is downloaded already)")
