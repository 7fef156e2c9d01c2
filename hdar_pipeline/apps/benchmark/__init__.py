"""``hdar benchmark``: registration methods compared on a dataset's pairs.
"""
