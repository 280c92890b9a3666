"""What the agent and the key server share, at the bottom of both: the wire protocol,
input validation, public-key pins, the private-file rule, CSR making and the HTTP/1
grammar.

It imports nothing from either side, so neither side imports the other.
"""
