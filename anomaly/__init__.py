"""anomaly"""
