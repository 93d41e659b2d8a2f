"""Agent secrets stored encrypted (Fernet, key from settings.SECRETS_ENCRYPTION_KEYS).

The column becomes text (a token is longer than the secret), then every plain secret is
encrypted in place; going back decrypts them again.
"""

from cryptography.fernet import InvalidToken
from django.db import migrations

import vms.fields


def rows(schema_editor):
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT id, agent_secret FROM vms_vsp")
        return cursor.fetchall()


def store(schema_editor, pk, value):
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("UPDATE vms_vsp SET agent_secret = %s WHERE id = %s", [value, pk])


def encrypt_existing(apps, schema_editor):
    for pk, value in rows(schema_editor):
        if not value:
            continue
        try:
            vms.fields.decrypt_secret(value)
            continue  # already a token of ours
        except InvalidToken:
            pass
        store(schema_editor, pk, vms.fields.encrypt_secret(value))


def decrypt_existing(apps, schema_editor):
    for pk, value in rows(schema_editor):
        if value:
            store(schema_editor, pk, vms.fields.decrypt_secret(value))


class Migration(migrations.Migration):
    dependencies = [("vms", "0003_vm_guest_id")]

    operations = [
        migrations.AlterField(
            model_name="vsp",
            name="agent_secret",
            field=vms.fields.EncryptedSecretField(
                help_text="Credential for the host agent; stored encrypted, never shown."
            ),
        ),
        migrations.RunPython(encrypt_existing, decrypt_existing),
    ]
