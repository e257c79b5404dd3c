"""Control from the cloud: signed device commands and rule deployment over the cloud link.

The wire protocol and the trust model are in docs/downlink.md.
"""
