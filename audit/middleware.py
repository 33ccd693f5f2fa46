import re
import uuid

from . import context

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


class AuditContextMiddleware:
    """Binds who/where/request-id for every event recorded while handling the request, and
    returns the request id (X-Request-ID) so a user's report can be matched to the trail."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        incoming = request.META.get("HTTP_X_REQUEST_ID", "")
        request_id = incoming if REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        request.audit_request_id = request_id
        user = getattr(request, "user", None)
        with context.bind(actor=user if user is not None and user.is_authenticated else None,
                          source_ip=context.client_ip(request),
                          user_agent=request.META.get("HTTP_USER_AGENT", "")[:255], request_id=request_id):
            response = self.get_response(request)
        response["X-Request-ID"] = request_id
        return response
