"""Tabular patient data: k-anonymity by Mondrian, DP statistics with OpenDP, linkage attacks."""
