"""The only code that imports rclpy: the node and its message conversions."""
