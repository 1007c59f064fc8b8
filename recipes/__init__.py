"""Recipe YAMLs users copy and edit; shipped inside the wheel."""
