"""vipd: a Layer-7 SMTP load balancer and clustering proxy, the email DMZ as one daemon."""

__version__ = "0.1.0"
