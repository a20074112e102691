"""Tracking at camera rate (ROS-free): SAM2's memory carries a mask from frame to frame.

``StreamingTracker`` (tracker.py) takes frames one at a time and keeps a bounded memory per
object; ``load_tracker_model`` (models.py) gives the stock SAM2 video model it runs.
"""
