"""PII redaction: e-mail addresses, phone numbers and IPv4 addresses become placeholders."""

from __future__ import annotations

import re

from llmray.data.filters.base import Mapper

_DIGIT = re.compile(r"\d")
EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
# International or North-American style numbers with at least 9 digits in separated groups.
PHONE = re.compile(r"(?<![\w.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w])")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")


class PiiRedact(Mapper):
    """Replaces e-mails, phone numbers and IPs with `email_token` etc.; counts each kind."""

    name = "pii"

    def __init__(self, email_token: str = "[EMAIL]", phone_token: str = "[PHONE]", ip_token: str = "[IP]"):
        self.email_token, self.phone_token, self.ip_token = email_token, phone_token, ip_token

    def map(self, text: str) -> tuple[str, dict[str, int]]:
        if "@" not in text and _DIGIT.search(text) is None:
            return text, {}
        t, n_email = EMAIL.subn(self.email_token, text)
        t, n_ip = IPV4.subn(self.ip_token, t)  # before phones: an IP looks like digit groups
        t, n_phone = PHONE.subn(self.phone_token, t)
        counts = {k: v for k, v in (("emails", n_email), ("phones", n_phone), ("ips", n_ip)) if v}
        return t, counts
