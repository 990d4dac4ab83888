"""Topic ACLs on the local cluster, for the fault tests of a principal denied an operation.

The cluster runs Kafka's ``StandardAuthorizer`` with ``allow.everyone.if.no.acl.found``: on a topic with no
ACL everyone may do anything, and ANONYMOUS (the plaintext listeners) is a super user. A DENY for one SCRAM
principal on a test's own topic therefore changes nothing else. aiokafka has no ACL API: these send the
CreateAcls and DeleteAcls requests it ships (``aiokafka.protocol.admin``) through its admin client.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.admin import CreateAclsRequest, DeleteAclsRequest

# the protocol's enums (org.apache.kafka.common.resource / acl)
TOPIC, LITERAL = 2, 3
ALL, READ, WRITE, DESCRIBE = 2, 3, 4, 8
DENY, ALLOW = 2, 3


async def _send(bootstrap: str, request: Any) -> Any:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15_000)
    await asyncio.wait_for(admin.start(), 30)
    try:
        return await asyncio.wait_for(admin._send_request(request), 30)  # aiokafka has no public ACL call
    finally:
        await admin.close()


async def grant(bootstrap: str, topic: str, principal: str, *operations: int, permission: int = ALLOW) -> None:
    """Add an ACL per operation for ``principal`` (``User:<name>``) on ``topic`` (ALLOW unless told); once
    ``topic`` has an ACL, a principal may do on it only what one allows. It holds on every broker a moment
    after this returns (the change travels through the metadata log): this waits a second for it."""
    for operation in operations:
        request = CreateAclsRequest(TOPIC, topic, LITERAL, principal, "*", operation, permission)
        response = await _send(bootstrap, request)
        errors = [(code, message) for code, message in response.creation_responses if code]
        assert not errors, f"CreateAcls refused: {errors}"
    await asyncio.sleep(1.0)


async def allow_again(bootstrap: str, topic: str) -> int:
    """Remove every ACL on ``topic``; how many there were."""
    anyone = DeleteAclsRequest(TOPIC, topic, LITERAL, None, None, 1, 1)  # None: any
    response = await _send(bootstrap, anyone)
    [(code, message, matching)] = [tuple(r) for r in response.filter_responses]
    assert not code, f"DeleteAcls refused: {code} {message}"
    await asyncio.sleep(1.0)
    return len(matching)
