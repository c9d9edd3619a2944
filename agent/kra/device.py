"""Device initialisation with KRA (selectInitOsdcInfo), and what to do when KRA says no.

KRA issues the cmcKey once per device (kra-oscu.md §6); a second initialisation is refused with
902 (some servers: 901) and does not return the key again. So the agent never initialises by
itself, and every refusal is explained with the way out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.errors import KraError
from agent.kra.client import KraClient
from agent.kra.codes import Outcome, describe
from agent.secret import Secret


@dataclass(frozen=True, slots=True)
class Initialised:
    cmc_key: Secret
    sdc_id: str
    mrc_no: str | None
    info: dict[str, Any]  # taxpayer and branch details, without the key


def explain_refusal(code: str, message: str, *, tin: str, bhf_id: str, serial: str) -> str:
    what = describe(code, message)
    if code == "902":
        return (f"{what}. KRA says device {serial!r} ({tin}/{bhf_id}) is already initialised and will not "
                "issue its key again. If you have the cmcKey and SCU id from that initialisation (another POS "
                "or an earlier install), adopt them with `etims-agent init --cmc-key KEY --scu-id ID`; "
                "otherwise ask KRA (timsupport@kra.go.ke) to reset the device")
    if code == "901":
        return (f"{what}. KRA does not accept serial {serial!r} for PIN {tin} branch {bhf_id}: check "
                "kra.device_serial, kra.tin and kra.branch_id against the OSCU approval, and that "
                "kra.environment matches it (a sandbox serial is unknown in production and the other way "
                "round). If the device was initialised before elsewhere, adopt its key with "
                "`etims-agent init --cmc-key KEY --scu-id ID`")
    return f"{what}. Check the device settings in [kra] and try again"


async def initialise(client: KraClient, *, tin: str, bhf_id: str, serial: str) -> Initialised:
    """Call selectInitOsdcInfo once; raise KraError with the way out if KRA does not give a key."""
    reply = await client.init_device(serial)
    if reply.outcome in (Outcome.RETRY, Outcome.UNKNOWN) and not reply.code.isdigit():
        raise KraError(f"could not reach KRA to initialise the device ({reply.message}); check the network "
                       "and kra.base_url, then run `etims-agent init` again")
    if not reply.ok:
        raise KraError(explain_refusal(reply.code, reply.message, tin=tin, bhf_id=bhf_id, serial=serial))
    info = (reply.data or {}).get("info") if isinstance(reply.data, dict) else None
    if not isinstance(info, dict) or not info.get("cmcKey") or not info.get("sdcId"):
        raise KraError("KRA answered the initialisation without a cmcKey or SCU id; nothing was stored. "
                       "Ask KRA whether the device is already initialised (then use --cmc-key and --scu-id)")
    public = {k: v for k, v in info.items() if k != "cmcKey"}
    return Initialised(cmc_key=Secret(str(info["cmcKey"])), sdc_id=str(info["sdcId"]),
                       mrc_no=None if info.get("mrcNo") is None else str(info["mrcNo"]), info=public)
