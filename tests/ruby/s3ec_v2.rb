# The official S3 Encryption Client V2 (Ruby, Debian's ruby-aws-sdk-s3), for the interop
# tests in tests/it/s3_encryption.rs: its KMS client is pointed at wrapd's AWS KMS API and its
# S3 client at the local S3 server, by the standard client options only.
#
#   ruby s3ec_v2.rb put|get BUCKET KEY FILE CONTEXT_JSON metadata|instruction_file
#
# Environment: S3_URL, WRAPD_AWS_URL, WRAPD_CA (the dev CA), WRAPD_AWS_CREDENTIALS (the dev
# credentials file, profile wrapd-dev), KEY_ARN.
require 'aws-sdk-s3'
require 'aws-sdk-kms'
require 'json'

mode, bucket, key, file, context_json, location = ARGV
kms = Aws::KMS::Client.new(
  endpoint: ENV.fetch('WRAPD_AWS_URL'),
  region: 'us-east-1',
  ssl_ca_bundle: ENV.fetch('WRAPD_CA'),
  credentials: Aws::SharedCredentials.new(
    path: ENV.fetch('WRAPD_AWS_CREDENTIALS'), profile_name: 'wrapd-dev'
  )
)
s3 = Aws::S3::Client.new(
  endpoint: ENV.fetch('S3_URL'),
  region: 'us-east-1',
  force_path_style: true,
  credentials: Aws::Credentials.new('test', 'test')
)
# Reads name no key: Debian 12 pairs ruby-aws-sdk-s3 1.117 with ruby-aws-sdk-kms 1.24, whose
# Decrypt predates the KeyId parameter that EncryptionV2 passes when it is given a key, so
# reads use the client's documented any-key mode (the key is the one the blob names).
client = Aws::S3::EncryptionV2::Client.new(
  client: s3,
  kms_key_id: mode == 'get' ? :kms_allow_decrypt_with_any_cmk : ENV.fetch('KEY_ARN'),
  kms_client: kms,
  key_wrap_schema: :kms_context,
  content_encryption_schema: :aes_gcm_no_padding,
  security_profile: :v2,
  envelope_location: location.to_sym
)
context = JSON.parse(context_json)
case mode
when 'put'
  client.put_object(bucket: bucket, key: key, body: File.binread(file),
                    kms_encryption_context: context)
when 'get'
  body = client.get_object(bucket: bucket, key: key, kms_encryption_context: context).body.read
  File.binwrite(file, body)
else
  abort "unknown mode #{mode}"
end
puts JSON.dump({ 'ok' => mode })
